{{/*
Helpers of the dashboard and alerts (templates/grafana-dashboard.yaml,
templates/prometheusrule.yaml; docs/operations.md, "Dashboard and alerts").
*/}}

{{/*
auth-sidecar.alertSelector — the PromQL label matchers that keep the rules to this release's
series: prometheusRule.selector, or by default the ServiceMonitor's job and the namespace.
*/}}
{{- define "auth-sidecar.alertSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
job="{{ include "auth-sidecar.fullname" . }}-metrics", namespace="{{ .Release.Namespace }}"
{{- end -}}
{{- end }}

{{/*
auth-sidecar.seconds — a sidecar duration ("10s", "1m30s", "500ms") as a number of seconds,
the way sidecar/config/types.py parse_duration reads it.
*/}}
{{- define "auth-sidecar.seconds" -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $text := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+$" $text) -}}
{{- fail (printf "prometheusRule: config.refresh.idp_timeout %q is not a duration like 10s; set prometheusRule.alerts.lockWait.thresholdSeconds" $text) -}}
{{- end -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)" $text -1 -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . -}}
{{- $total = addf $total (mulf (float64 $number) (index $units (trimPrefix $number .))) -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{/*
auth-sidecar.lockWaitThreshold — seconds of lock wait (p99) above which
AuthSidecarLockWaitAboveIdpTimeout fires: prometheusRule.alerts.lockWait.thresholdSeconds, or
when 0 the sidecar's refresh.idp_timeout (its default, 10s, when config sets none).
*/}}
{{- define "auth-sidecar.lockWaitThreshold" -}}
{{- $set := .Values.prometheusRule.alerts.lockWait.thresholdSeconds -}}
{{- if $set -}}
{{- $set -}}
{{- else -}}
{{- include "auth-sidecar.seconds" (dig "refresh" "idp_timeout" "10s" .Values.config) -}}
{{- end -}}
{{- end }}
