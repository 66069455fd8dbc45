"""What tests run in other processes, besides their fixtures (conftest.py): `lora_load_probe`, the user's-stack LoRA
loader the compatibility test runs under an older stack, and `folder_writer`, a writer of synthesis folders that the
lock test starts twice. The bundled model's and data's builders are the scripts' own (`scripts.tiny`), which the
tests import as the scripts' users."""
