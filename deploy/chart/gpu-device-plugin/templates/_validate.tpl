{{/* Values that name an NVIDIA feature this plugin does not serve end the render here, saying so,
     rather than being ignored. Called from the DaemonSet template. */}}
{{- define "gpu-device-plugin.validate" -}}
{{- $ns := include "gpu-device-plugin.namespace" . -}}
{{- if and (eq $ns "default") (not .Values.allowDefaultNamespace) -}}
{{- fail "namespace \"default\": install into a namespace of its own (e.g. kube-system), or set allowDefaultNamespace=true" -}}
{{- end -}}
{{- if .Values.cdi.featureFlags -}}
{{- fail "cdi.featureFlags: CDI feature flags are not served by this plugin (it refuses CDI_FEATURE_FLAGS); remove the value" -}}
{{- end -}}
{{- if eq (toString .Values.deviceDiscoveryStrategy) "tegra" -}}
{{- fail "deviceDiscoveryStrategy: tegra is not served by this plugin; use auto or nvml" -}}
{{- end -}}
{{- if not .Values.devicePlugin.enabled -}}
{{- fail "devicePlugin.enabled=false: this chart deploys only the device plugin; uninstall it instead" -}}
{{- end -}}
{{- if .Values.devicePlugin.enableHostNetwork -}}
{{- fail "devicePlugin.enableHostNetwork: not served: the plugin needs no network namespace of the host (unix sockets only)" -}}
{{- end -}}
{{- /* gfd.enabled is served in this pod (feature-labels); the values of NVIDIA's separate GFD pod are not. */ -}}
{{- $gfdUnserved := list -}}
{{- range $key := list "sleepInterval" "nameOverride" "namespaceOverride" "securityContext" "enableHostNetwork" -}}
{{- if not (empty (index $.Values.gfd $key)) -}}
{{- $gfdUnserved = append $gfdUnserved (printf "gfd.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- if $gfdUnserved -}}
{{- fail (printf "%s: not served: the GPU feature labels are made inside the plugin's pod by feature-labels (no GFD pod of its own to name, place or secure) and follow the health bus and the config at once (no sleep interval); remove the value" (join ", " $gfdUnserved)) -}}
{{- end -}}
{{- if .Values.nfd.enabled -}}
{{- fail "nfd.enabled: node-feature-discovery is not part of this chart; install NFD's own chart beside it" -}}
{{- end -}}
{{- if and .Values.mps.enableHostPID (not .Values.mps.root) -}}
{{- fail "mps.enableHostPID: only for MPS: set mps.root too (the host PID namespace is not needed otherwise)" -}}
{{- end -}}
{{- if and .Values.config.name .Values.config.map -}}
{{- fail "config: set only one of config.name (an existing ConfigMap) and config.map (configs built by this chart)" -}}
{{- end -}}
{{- if .Values.config.map -}}
{{- include "gpu-device-plugin.validateConfigMap" . -}}
{{- end -}}
{{- if and .Values.stateDir (not (hasPrefix "/var/lib/kubelet/device-plugins/" .Values.stateDir)) -}}
{{- fail (printf "stateDir %s: must lie under /var/lib/kubelet/device-plugins/, the only host directory this chart mounts" .Values.stateDir) -}}
{{- end -}}
{{- if and (or .Values.metrics.service.enabled .Values.metrics.podMonitor.enabled) (not .Values.metrics.port) -}}
{{- fail "metrics.service / metrics.podMonitor need metrics.port (0 means no metrics listener)" -}}
{{- end -}}
{{- end -}}

{{/* config.map: each entry must be a v1 config file; one must be selectable at pod start (the node
     label is not read here), and what decides the mounts must be chart values, not file keys. */}}
{{- define "gpu-device-plugin.validateConfigMap" -}}
{{- $map := .Values.config.map -}}
{{- range $name, $text := $map -}}
{{- $cfg := fromYaml $text -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "config.map.%s: not valid YAML: %s" $name $cfg.Error) -}}
{{- end -}}
{{- if ne (toString $cfg.version) "v1" -}}
{{- fail (printf "config.map.%s: version: %v is not supported; allowed values: v1" $name $cfg.version) -}}
{{- end -}}
{{- $flags := default dict $cfg.flags -}}
{{- $plugin := default dict $flags.plugin -}}
{{- if and $plugin.deviceListStrategy (not $.Values.deviceListStrategy) -}}
{{- fail (printf "config.map.%s: flags.plugin.deviceListStrategy decides the host directories mounted: set the chart value deviceListStrategy instead" $name) -}}
{{- end -}}
{{- if and $flags.nvidiaDriverRoot (not $.Values.nvidiaDriverRoot) -}}
{{- fail (printf "config.map.%s: flags.nvidiaDriverRoot decides the host directories mounted: set the chart value nvidiaDriverRoot instead" $name) -}}
{{- end -}}
{{- end -}}
{{- $fb := .Values.config.fallbackStrategies -}}
{{- $selectable := or .Values.config.default (and (has "named" $fb) (hasKey $map "default")) (and (has "single" $fb) (eq (len $map) 1)) (has "empty" $fb) -}}
{{- if not $selectable -}}
{{- fail (printf "config.map has %d configs and none is chosen without the node label (not served here): set config.default" (len $map)) -}}
{{- end -}}
{{- if and .Values.config.default (not (hasKey $map .Values.config.default)) -}}
{{- fail (printf "config.default %s is not in config.map (%s)" .Values.config.default (keys $map | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
