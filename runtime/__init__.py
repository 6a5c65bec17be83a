"""chmc.runtime"""
