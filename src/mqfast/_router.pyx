# A static router: exact paths in a dict, templated paths ("/api/v1/topics/{name}") matched
# segment by segment. Route ids index the per-route counters, so labels are route templates.

PRODUCE_TEMPLATE = "/api/v1/messages"
BATCH_TEMPLATE = "/api/v1/messages/batch"
CONSUME_TEMPLATE = "/api/v1/messages/consume"

cdef dict _METHOD_BITS = {
    b"GET": 1, b"POST": 2, b"PUT": 4, b"DELETE": 8, b"HEAD": 16, b"PATCH": 32, b"OPTIONS": 64,
}


cdef class Router:
    """Maps a request path to a route id; built once from the route table."""

    def __init__(self, list routes):
        cdef int i
        if len(routes) > MAX_ROUTES:
            raise ValueError(f"at most {MAX_ROUTES} routes")
        self.exact = {}
        self.templated = []
        self.templates = []
        self.methods = []
        self.allow = []
        self.masks = []
        self.produce_route = -1
        self.batch_route = -1
        self.consume_route = -1
        for i, (template, methods) in enumerate(routes):
            self.templates.append(template)
            self.methods.append(tuple(methods))
            # HEAD is GET without the body (RFC 9110 §9.3.2) wherever GET is served
            served = list(methods) + (["HEAD"] if "GET" in methods else [])
            self.allow.append(", ".join(served))
            self.masks.append(sum(_METHOD_BITS[m.encode()] for m in served))
            if "{" in template:
                segs = template.encode().strip(b"/").split(b"/")
                self.templated.append((i, [None if s.startswith(b"{") else s for s in segs]))
            else:
                self.exact[template.encode()] = i
            if template == PRODUCE_TEMPLATE:
                self.produce_route = i
            elif template == BATCH_TEMPLATE:
                self.batch_route = i
            elif template == CONSUME_TEMPLATE:
                self.consume_route = i

    cdef int match(self, bytes path, list params):
        cdef object hit = self.exact.get(path)
        if hit is not None:
            return <int>hit
        if len(path) > 1 and path.endswith(b"/"):
            hit = self.exact.get(path[:len(path) - 1])
            if hit is not None:
                return <int>hit
        segs = path.strip(b"/").split(b"/")
        for route, pattern in self.templated:
            if len(pattern) != len(segs):
                continue
            found = []
            for want, got in zip(pattern, segs):
                if want is None:
                    if not got:
                        break
                    found.append(got)
                elif want != got:
                    break
            else:
                params.extend(found)
                return route
        return -1

    def template(self, int route) -> str:
        return self.templates[route]

    def allowed(self, int route) -> tuple:
        return self.methods[route]

    def lookup(self, bytes path) -> tuple:
        """(route id or -1, path parameters): for tests."""
        cdef list params = []
        return self.match(path, params), params
