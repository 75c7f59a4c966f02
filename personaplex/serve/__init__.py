"""What the outside world calls: the contract (`contract`, torch-free: the service's interface, its
value types, errors and limits), the one call lifecycle both doors use (`call`), the service on
a local engine (`service`), `/api/chat` (`api_chat`), a cluster's engines behind the same face
(`remote`), the Ray Serve cluster (`cluster`, the only module that imports Ray) and the offline
CLI (`offline`). Nothing is imported here (see `personaplex`).
"""
