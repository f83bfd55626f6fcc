"""What a backend is told about an op call (shapes, dtype, options) and the argument checks that
build it: the contract shared by the ops above and the backends below."""
