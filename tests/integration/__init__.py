

def fresh_page() -> None:
    """Wait out the metrics endpoint's page cache (``MetricsPage.CACHE_SECONDS``): a
    scrape right after an action could be served the page rendered before it."""
    import time

    from policyd.metrics import MetricsPage

    time.sleep(MetricsPage.CACHE_SECONDS)
