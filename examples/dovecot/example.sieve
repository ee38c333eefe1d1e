# A global Sieve script (sieve_before = /etc/dovecot/sieve/before.sieve, compiled with sievec)
# that sends every message through the confined add-header filter.
require ["vnd.dovecot.filter"];

# As a test, a failed filter (non-zero exit, timeout) is simply false: the original message
# goes on unchanged.
if filter "add-header" {
  # the message is now the filter's output
}
