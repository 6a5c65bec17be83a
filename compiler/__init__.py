"""chmc.compiler"""
