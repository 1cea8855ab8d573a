"""Command lines: ``sparkme-pretrain`` (Hydra) and the other console scripts of pyproject."""
