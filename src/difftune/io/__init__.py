"""Files on disk, written atomically: images, sharded safetensors stores and their manifests."""
