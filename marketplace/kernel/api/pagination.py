"""Limit/offset pages with bounded numbers: a bad or out-of-range limit or offset is a 400 naming it."""

from rest_framework.pagination import LimitOffsetPagination

from marketplace.kernel.api.params import query_int

MAX_LIMIT = 500
MAX_OFFSET = 10**9


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    max_limit = MAX_LIMIT

    def get_limit(self, request):
        return query_int(request.query_params, self.limit_query_param, default=self.default_limit, minimum=1,
                         maximum=self.max_limit)  # fmt: skip

    def get_offset(self, request):
        return query_int(request.query_params, self.offset_query_param, default=0, minimum=0, maximum=MAX_OFFSET)

    def get_schema_operation_parameters(self, view):
        bounds = {self.limit_query_param: (1, self.max_limit), self.offset_query_param: (0, MAX_OFFSET)}
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            low, high = bounds[parameter["name"]]
            parameter["schema"].update(minimum=low, maximum=high)
        return parameters
