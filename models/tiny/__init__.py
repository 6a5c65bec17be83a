"""chmc.models.tiny"""
