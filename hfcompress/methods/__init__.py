"""The built-in transforms, one module per method; their options and registrations are in `hfcompress.configs`."""
