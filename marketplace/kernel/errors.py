"""Domain errors raised by services; the API turns each into a problem+json answer."""


class DomainError(Exception):
    status = 400
    code = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotAllowed(DomainError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class InvalidToken(DomainError):
    status = 401
    code = "token-invalid"
    title = "Invalid token"


class TokenUsed(DomainError):
    status = 409
    code = "token-used"
    title = "Token already used"


class TokenExpired(DomainError):
    status = 410
    code = "token-expired"
    title = "Token expired"


class StateConflict(DomainError):
    status = 409
    code = "state-conflict"
    title = "Not possible in the current state"
