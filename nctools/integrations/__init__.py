"""Optional integrations with other libraries, each an extra
(``pip install nctools-collapse[lightning]``)."""
