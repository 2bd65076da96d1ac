# metricsd .rpm, %preun: what %systemd_preun does (stop and disable on the last erase).
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable --now metricsd.service >/dev/null 2>&1 || :
fi
exit 0
