-- channel_permissions: a member receives a channel's events only when they may
-- see the channel (Discord's VIEW_CHANNEL), computed the way Discord does:
--
--   base   = @everyone's permissions | the member's roles' permissions
--            (everything, when the member owns the guild or has ADMINISTRATOR)
--   then the channel's overwrites, in order:
--     @everyone's overwrite (deny, then allow),
--     all the member's roles' overwrites together (deny, then allow),
--     the member's own overwrite (deny, then allow).
--
-- Where the data comes from:
--   subscription context (set by the gateway from the member's state; a role
--   change is an UpdateContext, effective from the next event):
--     guild_id          the guild (its id is also the @everyone role's id)
--     user_id           the member
--     roles             the member's role ids, comma-separated
--     role_permissions  "role_id:bits,..." for @everyone and every role of the member
--     owner             "true" when the member owns the guild
--   event headers (set by the chat API on channel-scoped events):
--     channel_id        the channel; events without it are guild-wide and pass
--     overwrites        the channel's overwrites, "id:allow:deny,..." (role or member ids)
--
-- Permission bits are decimal 64-bit integers.

local VIEW_CHANNEL = 1 << 10
local ADMINISTRATOR = 1 << 3

local function parse_pairs(text)
  local map = {}
  for id, bits in string.gmatch(text or "", "([^:,]+):(%d+)") do
    map[id] = math.tointeger(tonumber(bits)) or 0
  end
  return map
end

local function parse_overwrites(text)
  local map = {}
  for id, allow, deny in string.gmatch(text or "", "([^:,]+):(%d+):(%d+)") do
    map[id] = { allow = math.tointeger(tonumber(allow)) or 0, deny = math.tointeger(tonumber(deny)) or 0 }
  end
  return map
end

local function roles_of(text)
  local roles = {}
  for role in string.gmatch(text or "", "[^,]+") do
    roles[#roles + 1] = role
  end
  return roles
end

return function(event, subscription)
  local channel = event.headers.channel_id
  if channel == nil then
    return true
  end
  local context = subscription.context
  if context.owner == "true" then
    return true
  end
  local guild = context.guild_id
  local role_permissions = parse_pairs(context.role_permissions)
  local roles = roles_of(context.roles)

  local permissions = role_permissions[guild] or 0
  for _, role in ipairs(roles) do
    permissions = permissions | (role_permissions[role] or 0)
  end
  if permissions & ADMINISTRATOR ~= 0 then
    return true
  end

  local overwrites = parse_overwrites(event.headers.overwrites)
  local everyone = overwrites[guild]
  if everyone then
    permissions = (permissions & ~everyone.deny) | everyone.allow
  end
  local allow, deny = 0, 0
  for _, role in ipairs(roles) do
    local overwrite = overwrites[role]
    if overwrite then
      allow = allow | overwrite.allow
      deny = deny | overwrite.deny
    end
  end
  permissions = (permissions & ~deny) | allow
  local member = overwrites[context.user_id]
  if member then
    permissions = (permissions & ~member.deny) | member.allow
  end
  return permissions & VIEW_CHANNEL ~= 0
end
