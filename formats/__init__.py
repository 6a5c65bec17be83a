"""The ground floor: every folder kind chmc reads or writes, one typed manifest and one reader and
writer each. Nothing here imports torch at module level (the ONNX Runtime serving path reads
export manifests), and nothing imports any other chmc room but `chmc.errors`.

    checkpoint   a Hugging Face model folder (config.json + safetensors or .bin weights)
    artifact     `chmc build`'s output: K banks + index tables per merged tensor (chmc.json)
    export       `chmc export`'s ONNX folder (model.onnx + chmc.json with an `export` section)
    engine       `chmc engine`'s TensorRT folder (model.plan + engine.json + the export's chmc.json)
    repository   `chmc triton`'s Triton model repository (chmc-repository.json + model folders)

`chmc.formats.folders.open_folder(path)` returns the typed object for any of them.
"""
