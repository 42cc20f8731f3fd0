"""The monitor's HTTP interface: ping URLs, the JSON API, the dashboard and ``/metrics``."""
