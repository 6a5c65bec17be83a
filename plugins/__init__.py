"""chmc.plugins"""
