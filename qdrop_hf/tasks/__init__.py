"""What the task scripts share beside the engine: arguments, SQuAD post-processing, metrics, built-in vision networks."""
