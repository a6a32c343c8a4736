"""ModelGateways: one OpenAI endpoint in front of the ModelDeployments. The pure part (backends.py:
what each gateway routes to and its status; service.py: its Swarm service and secrets), its
credentials and TLS (credentials.py), the signed admin protocol (protocol.py, standard library
only), the push to every gateway replica (push.py, HTTP), and the front that runs in the
gateway image (front.py: it imports only protocol.py of npuswarm, and this file imports
nothing)."""
