"""A run's files and what is made from them: the file names (`files`), the records (`records`), the LoRA file
(`lora`), the Hub upload (`hub`), finding runs (`discovery`), a run's synthesis settings with a command line's
overrides (`settings`), and the synthesis folder every writer fills the same way (`folder`)."""
