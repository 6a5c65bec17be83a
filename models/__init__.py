"""chmc.models"""
