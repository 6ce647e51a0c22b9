"""One reader per weight-file format. Each is plain numpy/scipy (no TensorFlow)
and returns canonical (params, WeightSpec); see `vggembed.weights`."""
