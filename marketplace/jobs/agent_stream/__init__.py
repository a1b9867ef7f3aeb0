"""The agents' streams: one WebSocket per unit, served by an asynchronous connection server
(``server.py``), carrying the agent API's calls (``calls.py``) and the server's pushes."""
