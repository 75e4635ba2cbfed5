{{/*
Names. The base name is fixed ("auth-sidecar") rather than read from .Chart, so that the
sidecar-mode templates below also work when another chart calls them with only
(dict "Values" ... "Release" .Release): see "auth-sidecar.container".
*/}}
{{- define "auth-sidecar.name" -}}
{{- default "auth-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "auth-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "auth-sidecar" .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "auth-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "auth-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "auth-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "auth-sidecar.labels" -}}
helm.sh/chart: {{ include "auth-sidecar.chart" . }}
{{ include "auth-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "auth-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "auth-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding OIDC_CLIENT_SECRET, SESSION_KEY and REDIS_PASSWORD; never created here. */}}
{{- define "auth-sidecar.secretName" -}}
{{- default (include "auth-sidecar.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The image reference: repository:tag, pinned with @digest when image.digest is set. */}}
{{- define "auth-sidecar.image" -}}
{{- .Values.image.repository }}:{{ .Values.image.tag }}
{{- with .Values.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/* Put on the pod template as checksum/config: a config change rolls the pods. */}}
{{- define "auth-sidecar.configChecksum" -}}
{{- toYaml .Values.config | sha256sum }}
{{- end }}

{{/*
auth-sidecar.container — the sidecar's container, as one item of a pod's `containers:` list.

Standalone mode uses it in templates/deployment.yaml. In sidecar mode add it to your app's
pod template, next to the app container, which listens on 127.0.0.1 only:

  containers:
    - name: app
      ...
    {{- include "auth-sidecar.container" $sidecar | nindent 4 }}
  volumes:
    {{- include "auth-sidecar.volumes" $sidecar | nindent 4 }}

where, with this chart as a dependency of your chart,
  {{- $sidecar := dict "Values" (index .Values "auth-sidecar") "Release" .Release }}
and put `checksum/auth-sidecar-config: {{ include "auth-sidecar.configChecksum" $sidecar }}`
in the pod template's annotations. The ConfigMap it mounts is rendered by this chart (in
either mode). Port names: "proxy" (4180) and "management" (9180); point your Service's
targetPort at "proxy". Full example: examples/sidecar-deployment.yaml.
*/}}
{{- define "auth-sidecar.container" -}}
- name: auth-sidecar
  image: {{ include "auth-sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run"]
  env:
    - name: AUTH_SIDECAR_CONFIG
      value: /etc/auth-sidecar/config.yaml
    {{- with .Values.secretKeys.oidcClientSecret }}
    - name: OIDC_CLIENT_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ include "auth-sidecar.secretName" $ }}
          key: {{ . }}
    {{- end }}
    {{- with .Values.secretKeys.sessionKey }}
    - name: SESSION_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "auth-sidecar.secretName" $ }}
          key: {{ . }}
    {{- end }}
    {{- with .Values.secretKeys.redisPassword }}
    - name: REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "auth-sidecar.secretName" $ }}
          key: {{ . }}
          optional: true
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: proxy
      containerPort: {{ .Values.ports.http }}
      protocol: TCP
    - name: management
      containerPort: {{ .Values.ports.management }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: management
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: management
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: management
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  volumeMounts:
    - name: auth-sidecar-config
      mountPath: /etc/auth-sidecar
      readOnly: true
    - name: auth-sidecar-tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
auth-sidecar.volumes — the volumes the container mounts, as items of a pod's `volumes:` list:
the ConfigMap with config.yaml and an emptyDir at /tmp (the root filesystem is read-only).
*/}}
{{- define "auth-sidecar.volumes" -}}
- name: auth-sidecar-config
  configMap:
    name: {{ include "auth-sidecar.fullname" . }}
- name: auth-sidecar-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
