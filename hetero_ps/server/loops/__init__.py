"""The master's step loops: BSP (`bsp`) and SSP/ASP (`async_sgd`)."""
