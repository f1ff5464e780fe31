"""The shipped configs: get_config() functions returning ml_collections.ConfigDict."""
