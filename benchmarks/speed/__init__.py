"""Speed and memory benchmarks of the operator, the conversion, training steps and exports."""
