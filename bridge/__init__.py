"""bridge: keeps an order's status in agreement across Shoptet, MetaKocka and Bitrix24."""

__version__ = "0.1.0"
