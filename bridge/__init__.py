"""bridge: keeps an order's status in agreement across Shoptet and MetaKocka."""

__version__ = "0.1.0"
