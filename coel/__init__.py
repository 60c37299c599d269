"""The `coel` command, the top room: it may import every room below it, and none imports it."""
