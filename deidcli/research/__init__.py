"""The research side of deid: stress sets and measurements. It may import the product
(``deidcli``); the product never imports it."""
