"""Style LoRAs: fetched safely, checked, cached, applied for one batch."""
