"""The training core: the LightningModule, the four cases, phases, callbacks and checkpoints."""
