"""Transfer: fine-tuning and linear probing of pretrained MLPs, test-time augmentation, ReaL evaluation,
first-layer weight pictures (paper section 4.2, appendices A.3 and C). Entry point: `run.run_transfer`."""
