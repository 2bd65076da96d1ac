# metricsd .rpm, %postun: what %systemd_postun_with_restart does (restart on upgrade), and the
# spool directory removed on the last erase.
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart metricsd.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/metricsd
fi
exit 0
