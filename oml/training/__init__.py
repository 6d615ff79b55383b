"""Fine-tuning fingerprints into a model, one concept a module: its settings (`config`), the
dataset and benign replay (`dataset`), the loss and the Trainer (`trainer`), what runs between
steps (`callbacks`: stopping once memorised, weight averaging, shrinking the weight change),
weight algebra (`weights`) and where it runs (`backend`: TrainingArguments and DeepSpeed).
`oml.pipeline.fingerprint_model` puts them together."""
