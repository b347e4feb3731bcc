"""Fine-tuning on classification tasks, with co-finetuned teachers and multi-teacher KD."""
