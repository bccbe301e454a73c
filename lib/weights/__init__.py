"""The weights cache: manifest and lock, the cache folder, downloads from the Hub or a mirror."""
