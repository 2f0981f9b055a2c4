"""Training of Astrea: progressive contrastive pre-alignment and the demo job."""
