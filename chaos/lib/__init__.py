"""The fault suite's library: servers, HTTP, the load driver, the checks, the suite."""
