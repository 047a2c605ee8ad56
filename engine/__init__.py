"""linkcrm: signed Tolinku webhooks -> durable inbox -> YAML/JMESPath rules -> CRM actions."""

__version__ = "0.1.0"
