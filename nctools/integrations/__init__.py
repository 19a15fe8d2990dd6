"""Optional integrations with other libraries, each an extra
(``pip install neural-collapse[lightning]``)."""
