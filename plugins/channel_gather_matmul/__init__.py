"""chmc.plugins.channel_gather_matmul"""
