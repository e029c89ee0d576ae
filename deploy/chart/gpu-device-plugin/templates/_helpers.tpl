{{/* Names, labels and options, as NVIDIA's chart computes them (same value names). */}}
{{- define "gpu-device-plugin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-device-plugin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gpu-device-plugin.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "gpu-device-plugin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-device-plugin.selectorLabels" -}}
{{- if .Values.selectorLabelsOverride -}}
{{ toYaml .Values.selectorLabelsOverride }}
{{- else -}}
app.kubernetes.io/name: {{ include "gpu-device-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- if .Values.componentSelectorLabels.enabled }}
app.kubernetes.io/component: device-plugin
{{- end }}
{{- end }}

{{- define "gpu-device-plugin.labels" -}}
helm.sh/chart: {{ include "gpu-device-plugin.chart" . }}
{{ include "gpu-device-plugin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpu-device-plugin.image" -}}
{{- .Values.image.repository -}}:{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end }}

{{/* The ConfigMap the config-manager selects from: config.name, else the one built from config.map. */}}
{{- define "gpu-device-plugin.configMapName" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else if .Values.config.map -}}
{{- printf "%s-configs" (include "gpu-device-plugin.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether CDI specs are written: a CDI device-list strategy ("envvar" when unset, the plugin's
     default), or DRA (the dra-plugin writes each prepared claim's spec). */}}
{{- define "gpu-device-plugin.cdi" -}}
{{- $cdi := .Values.dra.enabled -}}
{{- range (splitList "," (default "envvar" .Values.deviceListStrategy)) -}}
{{- if hasPrefix "cdi-" (trim .) -}}{{- $cdi = true -}}{{- end -}}
{{- end -}}
{{- $cdi -}}
{{- end -}}

{{/* Whether any config may offer MIG devices (as NVIDIA's chart decides): the value, a config.map
     entry's flags.migStrategy, or an external ConfigMap (unknown here, so yes). */}}
{{- define "gpu-device-plugin.migPossible" -}}
{{- $mig := and .Values.migStrategy (ne .Values.migStrategy "none") -}}
{{- if .Values.config.name -}}{{- $mig = true -}}{{- end -}}
{{- range $name, $text := .Values.config.map -}}
{{- $flags := default dict (fromYaml $text).flags -}}
{{- if and $flags.migStrategy (ne (toString $flags.migStrategy) "none") -}}{{- $mig = true -}}{{- end -}}
{{- end -}}
{{- $mig -}}
{{- end -}}

{{/* The host's driver root is mounted (read-only, at /driver-root) when NVML or the CDI spec need it
     there: a driver root other than "/" (a containerized driver), or any CDI strategy. */}}
{{- define "gpu-device-plugin.mountDriverRoot" -}}
{{- $root := default "/" .Values.nvidiaDriverRoot -}}
{{- or (eq (include "gpu-device-plugin.cdi" .) "true") (ne $root "/") -}}
{{- end -}}

{{/* The GPUs DRA serves as the chart decides them: dra.devices when given; else "all" without a per-node
     config (nothing else could name them), and "" with one: each node's config file's dra.devices decides
     (an environment variable would override every file). */}}
{{- define "gpu-device-plugin.draDevices" -}}
{{- if .Values.dra.devices -}}
{{- .Values.dra.devices -}}
{{- else if not (include "gpu-device-plugin.configMapName" .) -}}
all
{{- end -}}
{{- end -}}
