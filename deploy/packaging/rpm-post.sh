# metricsd .rpm, %post: what %systemd_post does (the distribution's preset decides whether the
# unit is enabled on first install).
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload preset metricsd.service >/dev/null 2>&1 || :
fi
exit 0
