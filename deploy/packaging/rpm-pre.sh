# metricsd .rpm, %pre: the service's system user (kept on erase, as RPM distributions do).
getent passwd metricsd >/dev/null || \
    useradd --system --user-group --home-dir /var/lib/metricsd --no-create-home \
        --shell /sbin/nologin --comment "metricsd GPU node metrics agent" metricsd
exit 0
