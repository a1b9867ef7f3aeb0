from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        # Billing answers what jobs asks of it: money available at placement, usage to post
        # when an allocation ends, and charges so far beside a job's usage.
        from billing import selectors, services, wallet
        from marketplace.jobs import ports

        ports.funds_available.provide(wallet.wallet_available_micros)
        ports.usage_due.register(services.usage_post_request)
        ports.allocations_charged.provide(selectors.allocations_charged)
        ports.wallet_balance.provide(selectors.wallet_balance_micros)
