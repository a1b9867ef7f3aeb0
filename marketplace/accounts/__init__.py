"""People's accounts in the portal: sign-up, log in and out, password reset, profile."""
