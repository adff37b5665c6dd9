#Requires -Version 5.1
#Requires -RunAsAdministrator
<#
.SYNOPSIS
Install imageqc as a Windows service (see windows_service\README.md).

.DESCRIPTION
Creates a venv (or uses a Python installation dedicated to imageqc), installs imageqc with
pywin32, runs pywin32's post-install step, writes an example config if none exists (then stops so
you can edit it), checks the config, registers the service with restart-on-failure recovery
actions and starts it. Run it again after editing the config or to upgrade.

.PARAMETER Source
What to pip-install: a checkout or a wheel of imageqc. Default: the checkout this script is in.

.PARAMETER Python
The Python (3.10 or newer, installed for all users) to use. Default: the newest from the py launcher.

.PARAMETER Venv
Where to create the venv. "" installs into -Python itself (a Python dedicated to imageqc).

.PARAMETER Config
The config file. Use UNC paths (\\server\share\...) for shares, never mapped drive letters.

.PARAMETER Username
The service account (DOMAIN\user, or a gMSA ending in $). Default: LocalSystem.

.PARAMETER Startup
delayed (default), auto or manual.

.PARAMETER NoStart
Register the service but do not start it.

.EXAMPLE
.\windows_service\install.ps1 -Config C:\ProgramData\imageqc\imageqc.toml -Username 'LAB\svc-imageqc'
#>
[CmdletBinding()]
param(
    [string]$Source = (Resolve-Path (Join-Path $PSScriptRoot "..")).Path,
    [string]$Python = "",
    [string]$Venv = "C:\Program Files\imageqc\venv",
    [string]$Config = "C:\ProgramData\imageqc\imageqc.toml",
    [string]$Username = "",
    [ValidateSet("delayed", "auto", "manual")][string]$Startup = "delayed",
    [switch]$NoStart
)
$ErrorActionPreference = "Stop"

function Invoke-Checked([string]$Exe, [string[]]$Arguments) {
    Write-Host "> $Exe $($Arguments -join ' ')"
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "'$Exe $($Arguments -join ' ')' failed (exit code $LASTEXITCODE)" }
}

# 1. Python
if (-not $Python) {
    $Python = (& py -3 -c "import sys; print(sys.executable)" | Select-Object -First 1)
    if ($LASTEXITCODE -ne 0 -or -not $Python) { throw "No Python found by the py launcher: install Python 3.10+ for all users, or pass -Python" }
    $Python = $Python.Trim()
}
$version = (& $Python -c "import sys; print('%d.%d' % sys.version_info[:2])").Trim()
if ([version]$version -lt [version]"3.10") { throw "$Python is Python $version; imageqc needs 3.10 or newer" }
if ($Python -like "$env:LOCALAPPDATA*" -or $Python -like "$env:USERPROFILE*") {
    Write-Warning "$Python is a per-user installation the service account cannot read; install Python for all users"
}

# 2. imageqc and pywin32
if ($Venv) {
    $Py = Join-Path $Venv "Scripts\python.exe"
    if (-not (Test-Path $Py)) { Invoke-Checked $Python @("-m", "venv", $Venv) }
    $Imageqc = Join-Path $Venv "Scripts\imageqc.exe"
} else {
    $Py = $Python
    $Imageqc = Join-Path (Split-Path $Python) "Scripts\imageqc.exe"
}
Invoke-Checked $Py @("-m", "pip", "install", "--upgrade", "pip")
Invoke-Checked $Py @("-m", "pip", "install", "--upgrade", "$($Source)[windows]")
Invoke-Checked $Py @("-m", "pywin32_postinstall", "-install")

# 3. the config
if (-not (Test-Path $Config)) {
    New-Item -ItemType Directory -Force -Path (Split-Path $Config) | Out-Null
    $example = & $Imageqc config example
    if ($LASTEXITCODE -ne 0) { throw "imageqc config example failed" }
    # UTF-8 without a byte-order mark (TOML readers reject the BOM Set-Content would write)
    [System.IO.File]::WriteAllLines($Config, [string[]]$example)
    Write-Host "Wrote an example config to $Config."
    Write-Host "Edit it (watch roots as UNC paths, state_dir on a local disk, uploads), then run this script again."
    exit 1
}
Invoke-Checked $Imageqc @("config", "check", $Config)

# 4. the service (reinstalled, so a changed account or start type takes effect)
if (Get-Service -Name imageqc -ErrorAction SilentlyContinue) { Invoke-Checked $Imageqc @("service", "remove") }
$install = @("service", "install", "--config", $Config, "--startup", $Startup)
if ($Username) { $install += @("--username", $Username) }
Invoke-Checked $Imageqc $install
if (-not $NoStart) {
    Invoke-Checked $Imageqc @("service", "start")
    Invoke-Checked $Imageqc @("status", "--config", $Config)
}
Write-Host "Recovery actions: sc.exe qfailure imageqc    Event log: Get-EventLog -LogName Application -Source imageqc -Newest 20"
