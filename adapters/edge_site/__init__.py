"""An edge site (a box running ``derms-gateway edge``) as one DER of a head-end gateway, over
the head end's MQTT broker: readings from the site's outbox, commands to its Grid DERMS link."""

from adapters.edge_site.device import EdgeSiteDevice, EdgeSiteEndpoint

__all__ = ["EdgeSiteDevice", "EdgeSiteEndpoint"]
