"""Commands: plugins, schema, init, import and bisect."""
